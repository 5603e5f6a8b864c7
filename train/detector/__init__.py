"""EfficientDet cell detector: model registry, training, evaluation and prediction.

Layout (effdet/anomalib style): :mod:`.torch_model` holds the exportable network (backbone + BiFPN + shared
heads, raw per-anchor outputs only); :mod:`.train_model` adds anchor labelling and the loss for training;
:mod:`.predictor` adds padding, decode and NMS for prediction. Nothing here imports torch at package import.
"""
