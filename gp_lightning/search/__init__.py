"""``allocation: search``: every block's width chosen by evolutionary search on the KL divergence from the dense model.

``config`` declares the keys; ``evolution`` is the pure math of allocations under the budget; ``variants`` the layer
variants (kept units and their refit); ``fitness`` writes allocations into the model and measures them; ``run`` is
the search itself; ``step`` joins it to the pipeline.
"""
