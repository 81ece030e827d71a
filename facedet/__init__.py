"""The face-detection toolkit the model families share.

Everything that follows from the RetinaFace output contract — ``(boxes, class
logits, landmarks)`` per prior — and not from one family's architecture: the
shared building blocks (:mod:`facedet.modules`: MobileNetV1 body, SSH, heads),
architecture specs, priors, box coding, detection, losses, preprocessing, data,
evaluation and agreement with a reference detector.  It does not import the
engine (:mod:`compressor`).
"""
