"""Result files of dsr-certify: loading (each file once), certified-accuracy tables with 95 %
intervals, the paper's figures, the sweep report, paired comparisons, per-class views, W&B."""

from .compare import PAIR_KEYS, PairedComparison, check_paired, compare
from .per_class import per_class_frame, reject_by_predicted_class
from .plots import (
    certified_accuracy_curve,
    count_histogram,
    plot_certified_accuracy,
    plot_count_histogram,
    save_figure,
)
from .report import log_to_wandb, main, read_inputs, write_report
from .tables import (
    REQUIRED_COLUMNS,
    Result,
    abstain_rate,
    acr_interval,
    average_certified_radius,
    certified_accuracy,
    certified_counts,
    clean_accuracy,
    clopper_pearson,
    default_radii,
    display_label,
    load_results,
    markdown_table,
    read_result,
    reject_fraction,
    resolve_labels,
    summary_frame,
    summary_table,
)

__all__ = [
    "PAIR_KEYS", "REQUIRED_COLUMNS", "PairedComparison", "Result", "abstain_rate", "acr_interval",
    "average_certified_radius", "certified_accuracy", "certified_accuracy_curve",
    "certified_counts", "check_paired", "clean_accuracy", "clopper_pearson", "compare",
    "count_histogram", "default_radii", "display_label", "load_results", "log_to_wandb", "main",
    "markdown_table", "per_class_frame", "plot_certified_accuracy", "plot_count_histogram",
    "read_inputs", "read_result", "reject_by_predicted_class", "reject_fraction",
    "resolve_labels", "save_figure", "summary_frame", "summary_table", "write_report",
]
