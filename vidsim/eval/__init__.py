"""Evaluation of trained models. Every result is a JSON file under W/eval/."""
