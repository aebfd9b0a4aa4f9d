"""Evaluation: LLM Foundry-style in-context-learning tasks and the lm-eval-harness adapter.

Plain PyTorch over a model callable; Composer wiring lives in training/icl_eval.py.
"""
