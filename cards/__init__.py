"""Hyper-parameter cards, installed as package data: cards/<method>/<model_type>.yaml."""
