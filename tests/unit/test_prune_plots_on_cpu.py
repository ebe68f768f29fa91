"""The per-block sparsity plot is written as a PNG."""

from effsft.prune.plots import plot_block_sparsity


def test_plot_block_sparsity_writes_png(tmp_path):
    report = {
        "settings": {"criterion": "wanda"}, "effective": {"method": "dlp"}, "global": {"target": 0.7},
        "blocks": [{"index": i, "target": t, "achieved": t + 1e-4, "clamped": t >= 0.99}
                   for i, t in enumerate([0.55, 0.65, 0.8, 0.99])],
    }
    out = plot_block_sparsity(report, tmp_path / "sub" / "sparsity.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
