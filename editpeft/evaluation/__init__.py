"""The evaluation harness: dataset loaders, protocol-tagged metrics, runners and reports.

Example:
    >>> from editpeft.evaluation import load_cases, evaluate
    >>> cases = load_cases("zsre_one_hop.json", n=20)                           # doctest: +SKIP
    >>> evaluate(model, tokenizer, ["rome", "grace"], cases, mode="sequential")  # doctest: +SKIP
"""
from .cases import EvalCase, Probe
from .datasets import FORMATS, Dataset, detect_format, load_cases, load_dataset
from .metrics import FLUENCY, PROTOCOLS, CaseScorer, ngram_entropy
from .report import combine, summarize, write_report
from .runner import MODES, evaluate

__all__ = ["EvalCase", "Probe", "FORMATS", "Dataset", "detect_format", "load_cases", "load_dataset", "PROTOCOLS",
           "FLUENCY", "CaseScorer", "ngram_entropy", "combine", "summarize", "write_report", "MODES", "evaluate"]
