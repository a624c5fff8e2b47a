"""Labelled click data: the in-memory dataset, readers for Criteo text, npy days and .npz, the synthetic generator."""
