"""The run report's per-task tables, built from prediction records (what `predict` writes,
with the gold labels the rows carry). Each task's `report_tables` picks the ones that fit it;
scikit-learn and seqeval are imported only when a report is made."""

from __future__ import annotations

from shardtune.metrics import squad_scores
from shardtune.tasks.base import ReportTable


def _labelled(records: list[dict], gold: str) -> list[dict]:
    return [r for r in records if r.get(gold) is not None]


def classification(labels: list[str], records: list[dict], gold: str = "label") -> list[ReportTable]:
    """Per-class precision, recall, F1 and support, and the confusion matrix (rows: gold)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    scored = _labelled(records, gold)
    if not scored:
        return []
    truth, predicted = [r[gold] for r in scored], [r["prediction"] for r in scored]
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
    absent = [label for label, n in zip(labels, support) if n == 0]
    per_class = ReportTable(
        "per-class scores", ["label", "precision", "recall", "F1", "support"],
        [[label, round(float(p), 4), round(float(r), 4), round(float(f), 4), int(n)]
         for label, p, r, f, n in zip(labels, precision, recall, f1, support)],
        note=(f"labels absent from this split (left out of macro-F1): {', '.join(absent)}" if absent else ""))
    matrix = confusion_matrix(truth, predicted, labels=labels)
    confusion = ReportTable("confusion matrix (rows: gold label, columns: predicted)", ["gold \\ predicted", *labels],
                            [[label, *map(int, row)] for label, row in zip(labels, matrix)])
    return [per_class, confusion]


def tagging(records: list[dict]) -> list[ReportTable]:
    """Per-entity-type precision, recall, F1 and support (seqeval's CoNLL chunks)."""
    from seqeval.metrics import classification_report

    scored = _labelled(records, "tags")
    if not scored:
        return []
    report = classification_report([r["tags"] for r in scored], [r["prediction"] for r in scored],
                                   output_dict=True, zero_division=0)
    rows = [[name, round(float(v["precision"]), 4), round(float(v["recall"]), 4), round(float(v["f1-score"]), 4),
             int(v["support"])] for name, v in report.items()]
    return [ReportTable("per-entity scores", ["entity", "precision", "recall", "F1", "support"], rows)]


def question_answering(records: list[dict]) -> list[ReportTable]:
    """Exact match and F1 for answerable and unanswerable questions apart (SQuAD 2.0's split)."""
    scored = _labelled(records, "answers")
    if not scored:
        return []
    rows = []
    for name, group in (("answerable", [r for r in scored if any(r["answers"])]),
                        ("unanswerable", [r for r in scored if not any(r["answers"])]), ("all", scored)):
        if group:
            scores = squad_scores([r["prediction"] for r in group], [[a for a in r["answers"] if a] for r in group])
            rows.append([name, len(group), round(scores["exact_match"], 2), round(scores["f1"], 2)])
    return [ReportTable("exact match and F1 by question kind", ["questions", "count", "exact match", "F1"], rows)]


def samples(records: list[dict], columns: list[str], limit: int = 10, title: str = "sample outputs") -> list[ReportTable]:
    """The first `limit` records' columns, texts shortened for the page."""
    if not records:
        return []
    present = [c for c in columns if any(c in r for r in records[:limit])]
    rows = [[_short(r.get(c, "")) for c in present] for r in records[:limit]]
    return [ReportTable(title, present, rows, note=f"the first {len(rows)} of {len(records)}")]


def _short(value, limit: int = 400) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"
