"""Cas-SEAT on Ray."""
