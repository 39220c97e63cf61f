"""Training with the recipe of Simonyan & Zisserman (arXiv:1409.1556, section 3.1).

Entry point: ``python -m training.run --cfg D`` (see :mod:`training.run`).
"""
