"""biodistill.engine.deploy: what a fine-tuned compact model costs where it runs.

``export.py`` turns a task model directory into ONNX Runtime models (fp32 with transformer fusions, and
int8), each checked against PyTorch; ``cli.py`` is ``biodistill-export``. biodistill-evaluate uses both to
score every fine-tuned model again as it would be deployed, and to time it.
"""
