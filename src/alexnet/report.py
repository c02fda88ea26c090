"""The report of a finished run: report.md in the run folder, with the final metrics, the epochs, the
accuracy of each class and the confusion matrix (confusion.png beside it when matplotlib is installed)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import atomic_path
from .errors import ConfigError
from .logs import by_epoch, summary_table, validated
from .plots import confusion_figure, save


def per_class(confusion: list[list[int]], classes: list[str]) -> list[dict]:
    """For each class: its validation images, how many were predicted right, and the accuracy."""
    rows = []
    for i, (name, row) in enumerate(zip(classes, confusion)):
        total = sum(row)
        rows.append({"class": name, "images": total, "correct": row[i], "acc": row[i] / total if total else None})
    return rows


def confusion_table(confusion: list[list[int]], classes: list[str], most: int = 20) -> list[str]:
    """The confusion matrix as a Markdown table of counts (the figure needs matplotlib; the table does
    not), for up to `most` classes."""
    if len(classes) > most:
        return [f"({len(classes)} classes: too many for a table; `alexnet eval --confusion FILE.png` draws it.)", ""]
    rows = ["| true \\ predicted | " + " | ".join(classes) + " |", "| --- |" + " --- |" * len(classes)]
    rows += [f"| {name} | " + " | ".join(str(v) for v in row) + " |" for name, row in zip(classes, confusion)]
    return rows + [""]


def write(out: Path, history: list[dict], confusion: list[list[int]], classes: list[str], cfg: dict) -> Path:
    history = by_epoch(history)
    last = history[-1]  # the last epoch is always validated
    best = max(validated(history), key=lambda m: m["val_acc1"])
    try:
        save(confusion_figure(confusion, classes, f"{out.name}: validation, epoch {last['epoch']}"),
             out / "confusion.png")
        figure = "![confusion matrix](confusion.png)"
    except (ConfigError, OSError) as e:  # no matplotlib, or a full disk: the report says so and is written
        figure = f"(no confusion matrix image: {e})"
    views = {"none": "centre crop", "flip": "centre crop and its mirror, softmax averaged",
             "10crop": "10 crops (corners, centre and mirrors), softmax averaged"}[cfg.get("val_tta", "none")]
    lines = [
        f"# {out.name}",
        "",
        f"{cfg['arch']} on {cfg['data'] or 'the built-in dataset'}"
        + (f", recipe {cfg['recipe']}" if cfg.get("recipe") else "")
        + f"; {cfg['epochs']} epochs; validation by {views}.",
        "",
        "| | top-1 | top-5 | loss |",
        "| --- | --- | --- | --- |",
        f"| final (epoch {last['epoch']}) | {last['val_acc1']:.2%} | {last['val_acc5']:.2%} | {last['val_loss']:.4f} |",
        f"| best (epoch {best['epoch']}) | {best['val_acc1']:.2%} | {best['val_acc5']:.2%} | {best['val_loss']:.4f} |",
        "",
        "## Epochs",
        "",
        "```text",
        summary_table(history),
        "```",
        "",
        "## Accuracy of each class (final epoch, top-1)",
        "",
        "| class | images | correct | top-1 |",
        "| --- | --- | --- | --- |",
    ]
    for r in per_class(confusion, classes):
        acc = f"{r['acc']:.2%}" if r["acc"] is not None else "-"
        lines.append(f"| {r['class']} | {r['images']} | {r['correct']} | {acc} |")
    lines += ["", "## Confusion matrix", "", "Rows: true class; columns: predicted class.", "", figure, "",
              *confusion_table(confusion, classes)]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines))
    return path
