"""Outputs a method makes besides the merged model, stored in a folder beside it and applied
later: EMR's task masks and rescalers (emr.py), Twin-Merging's compressed exclusive parts
(twin.py), and the store both share (store.py: where side files live, how they are written
atomically with the merge and read back). Adapters, RMM bases and MoE routers belong here too.
"""
