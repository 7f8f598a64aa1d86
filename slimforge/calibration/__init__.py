"""Calibration shared by pruning and quantization: walk a model block by block, measure each
block's linear inputs, and solve the layer-wise OBS problem.

- :mod:`slimforge.calibration.windows`: a calibrating stage's model and token windows;
- :mod:`slimforge.calibration.layerwise`: :func:`~slimforge.calibration.layerwise.layerwise`,
  one decoder block at a time on the inputs the blocks before it (already changed) produce;
- :mod:`slimforge.calibration.activations`: per-linear input statistics (Wanda's norms, Hessians);
- :mod:`slimforge.calibration.hessian`: the one OBS solver SparseGPT and GPTQ share.

Nothing is imported here, so the package costs nothing until a method uses it.
"""
