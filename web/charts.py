"""Small server-side SVG line charts: numbers in, polyline points out. No JavaScript needed."""

from dataclasses import dataclass

WIDTH, HEIGHT, PAD = 640, 200, 32
COLORS = ["#2f5bea", "#1f7a3d", "#b42318", "#9a6700", "#6e40c9"]


@dataclass(frozen=True)
class Series:
    name: str
    color: str
    points: str  # "x,y x,y ..." in SVG coordinates
    last: float | None


@dataclass(frozen=True)
class LineChart:
    series: list[Series]
    x_labels: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def empty(self) -> bool:
        return not any(series.points for series in self.series)


def line_chart(
    labels: list[str], series: dict[str, list[float | None]], *, low: float = -0.2, high: float = 1.0
) -> LineChart:
    """One line per series over the shared x labels; missing values break nothing, they are skipped."""
    count = max(len(labels), 1)

    def x(index: int) -> float:
        return PAD + (WIDTH - 2 * PAD) * (index / (count - 1) if count > 1 else 0.5)

    def y(value: float) -> float:
        clipped = min(max(value, low), high)
        return HEIGHT - PAD - (HEIGHT - 2 * PAD) * (clipped - low) / (high - low)

    lines = []
    for number, (name, values) in enumerate(series.items()):
        coordinates = [f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values) if v is not None]
        present = [v for v in values if v is not None]
        lines.append(
            Series(name, COLORS[number % len(COLORS)], " ".join(coordinates), present[-1] if present else None)
        )
    step = max(1, count // 6)
    x_labels = [(x(i), label) for i, label in enumerate(labels) if i % step == 0 or i == count - 1]
    ticks = [round(low + (high - low) * k / 4, 2) for k in range(5)]
    return LineChart(lines, x_labels, [(y(t), f"{t:g}") for t in ticks])
