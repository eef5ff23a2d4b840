"""Mixture-of-experts models built from dense experts or shrunk by merging experts: layouts
(layouts.py), assembly as mergekit-moe, BTX and upcycling (assemble.py, router rows from
gates.py), FlexOlmo (flexolmo.py), compression by MC-SMoE, HC-SMoE and Sub-MoE (compress.py).
A layer above calibrate/ (router rows and routing statistics come from forward passes); the
maths is in methods/moe_*.py and the writing is the engine's (engine/program.py).
"""
