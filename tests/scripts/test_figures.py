"""scripts/_lib/figures.py's save_figure: the bytes savefig writes, written atomically; a failed
write leaves no temporary file and names the target."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from scripts._lib.figures import save_figure  # noqa: E402


@pytest.fixture
def fig():
    f, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    yield f
    plt.close(f)


def test_same_bytes_as_savefig_and_no_temporary_left(tmp_path, fig):
    fig.savefig(tmp_path / "direct.png", dpi=50)
    (tmp_path / "atomic.png").write_bytes(b"old")  # replaced whole
    assert save_figure(fig, tmp_path / "atomic.png", dpi=50) == tmp_path / "atomic.png"
    assert (tmp_path / "atomic.png").read_bytes() == (tmp_path / "direct.png").read_bytes()
    save_figure(fig, tmp_path / "f.pdf")  # the suffix picks the format
    assert (tmp_path / "f.pdf").read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.png", "direct.png", "f.pdf"]


def test_failures_name_the_target_and_leave_nothing(tmp_path, fig):
    missing = tmp_path / "no_such_dir" / "f.png"
    with pytest.raises(FileNotFoundError, match="no_such_dir/f.png"):
        save_figure(fig, missing)
    with pytest.raises(ValueError, match="expected a path with an image suffix.*got"):
        save_figure(fig, tmp_path / "noext")
    with pytest.raises(ValueError, match="not supported"):  # matplotlib's, before any write
        save_figure(fig, tmp_path / "f.xyz")
    (tmp_path / "d.png").mkdir()  # a folder where the file goes: os.replace fails
    with pytest.raises(IsADirectoryError) as e:
        save_figure(fig, tmp_path / "d.png")
    assert str(tmp_path / "d.png") in str(e.value) and ".tmp" not in str(e.value), str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["d.png"]
