"""Compensation: refit what remains of o_proj and down_proj so each block's output stays close to the dense one.

``refit`` is the math (least squares on input Gram matrices, FLAP's bias, structured OBS choice of
units); ``layerwise`` accumulates the Grams while it walks the decoder layer by layer (one layer's
statistics at a time, optionally feeding each layer the pruned-and-compensated outputs of the
layers before it); ``offload`` reads the layers from disk one at a time for models that do not fit;
``run.compensate`` is the step: plan in, compensated weights out.
"""
