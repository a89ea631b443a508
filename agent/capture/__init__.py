"""Prediction capture: sampling policies (inline, cheap), the bounded on-disk queue and its sender."""
