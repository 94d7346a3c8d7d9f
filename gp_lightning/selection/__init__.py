"""Selection: which units go. ``constraints`` holds the per-layer limits, ``greedy`` the knapsack,
``result`` what came out (the plan, budget figures and a per-layer summary)."""
