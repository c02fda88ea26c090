"""Distributed AlexNet: train, evaluate and predict with AlexNet image classifiers."""

__version__ = "0.1.0"
