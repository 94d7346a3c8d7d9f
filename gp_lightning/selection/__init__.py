"""Selection: which units go. ``config`` holds the budget and per-layer limits, ``greedy`` the knapsack,
``plan`` the kept units (the hand-off to surgery), ``result`` what came out (budget figures, a per-layer
summary)."""
