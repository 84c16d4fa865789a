"""Result files of certify.py: loading, certified-accuracy tables, the paper's figures, W&B."""

from .plots import (
    certified_accuracy_curve,
    count_histogram,
    plot_certified_accuracy,
    plot_count_histogram,
)
from .report import log_to_wandb, main, write_report
from .tables import (
    REQUIRED_COLUMNS,
    abstain_rate,
    average_certified_radius,
    certified_accuracy,
    clean_accuracy,
    default_radii,
    display_label,
    load_results,
    load_settings,
    markdown_table,
    reject_fraction,
    resolve_labels,
    summary_frame,
    summary_table,
)

__all__ = [
    "REQUIRED_COLUMNS", "abstain_rate", "average_certified_radius", "certified_accuracy",
    "certified_accuracy_curve", "clean_accuracy", "count_histogram", "default_radii",
    "display_label", "load_results", "load_settings", "log_to_wandb", "main", "markdown_table",
    "plot_certified_accuracy", "plot_count_histogram", "reject_fraction", "resolve_labels",
    "summary_frame", "summary_table", "write_report",
]
