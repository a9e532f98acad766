"""Draws the method figures of docs/method.md (anchors and relations) into docs/img/.

    python docs/make_figures.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

OUT = Path(__file__).resolve().parent / "img"


def _unit(angle_deg: float) -> np.ndarray:
    angle = np.deg2rad(angle_deg)
    return np.array([np.cos(angle), np.sin(angle)])


def _panel(ax, title: str, anchors, target, target_label: str, others=(), other_label: str = "") -> None:
    circle = plt.Circle((0, 0), 1.0, fill=False, color="0.8", lw=1)
    ax.add_patch(circle)
    for j, anchor in enumerate(anchors):
        ax.plot(*anchor, "s", color="tab:blue", ms=8)
        ax.annotate(f"$a_{j + 1}$", anchor, textcoords="offset points", xytext=(6, 6), color="tab:blue")
        for point, color, width in [(target, "tab:red", 1.8)] + [(o, "0.6", 0.8) for o in others]:
            direction = (point - anchor) / np.linalg.norm(point - anchor)
            ax.annotate("", anchor + 0.35 * direction, anchor,
                        arrowprops={"arrowstyle": "->", "color": color, "lw": width})
    ax.plot(*target, "o", color="tab:red", ms=9)
    ax.annotate(target_label, target, textcoords="offset points", xytext=(6, -14), color="tab:red")
    for k, other in enumerate(others):
        ax.plot(*other, "o", color="0.6", ms=6)
        if k == 0:
            ax.annotate(other_label, other, textcoords="offset points", xytext=(6, 6), color="0.4")
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")
    ax.set_xlim(-1.3, 1.3)
    ax.set_ylim(-1.3, 1.3)
    ax.axis("off")


def relations_figure(path: Path) -> None:
    """Anchors from the teacher's memory, and the relation directions normalize(x - a_j) that CRCD
    compares: the student's relations to the teacher's relations of the same sample (positive) and
    of other samples (negatives)."""
    anchors = [_unit(a) for a in (20, 110, 200, 290)]
    positive, student = _unit(60), _unit(75) * 0.97
    negatives = [_unit(150), _unit(250), _unit(330)]
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.2))
    _panel(axes[0], "teacher side: relations of the positive $c_0$\n(grey: of negatives $c_k$)",
           anchors, positive, "$c_0$", negatives, "$c_k$")
    _panel(axes[1], "student side: relations of $v_i$ to the same anchors", anchors, student, "$v_i$")
    fig.suptitle("CRCD scores $\\langle$normalize$(c_k - a_j)$, normalize$(v_i - a_j)\\rangle / \\tau$", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    relations_figure(OUT / "relations.png")
    print(f"wrote {OUT / 'relations.png'}")
