"""Pruning: the criteria that choose what a compressed model keeps."""
