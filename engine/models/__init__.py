"""The two models: what the engine asks of an encoder (outputs.py: Needs, Outputs, encode), the frozen
teacher (teacher.py: loading, placement), the student builders (students.py), MiniALBERT
(minialbert.py), the published compact models' shapes (published.py) and the ``--smoke`` shrink
(smoke.py)."""
