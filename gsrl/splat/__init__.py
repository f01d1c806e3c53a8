"""Gaussian splatting for gsrl: scene I/O, mesh conversion, rendering and the Real2Sim tools.

Kept free of ManiSkill and gRPC imports at package level so the renderer can be used (and tested) alone.
"""
