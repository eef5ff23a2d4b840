"""Mixture-of-experts models: assembled from dense experts (assemble.py, by the layouts of
layouts.py, router rows from gates.py), compressed, and FlexOlmo's domain routers."""
