import numpy as np
import pytest
from PIL import Image

from alexnet.cli import main
from alexnet.data import load_rgb
from conftest import write_folder


def save(tmp_path, img: Image.Image, name: str, **kw):
    p = tmp_path / name
    img.save(p, **kw)
    return p


def test_rgb_png_unchanged(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    out = load_rgb(save(tmp_path, Image.fromarray(x), "a.png"))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), x)


def test_greyscale_png(tmp_path):
    x = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = np.asarray(load_rgb(save(tmp_path, Image.fromarray(x, "L"), "g.png")))
    assert out.shape == (8, 8, 3) and all(np.array_equal(out[..., c], x) for c in range(3))


def test_16bit_png_is_scaled_not_white(tmp_path):
    x = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000
    p = tmp_path / "deep.png"
    Image.fromarray(x).save(p)
    assert Image.open(p).mode.startswith("I")
    out = np.asarray(load_rgb(p))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    assert np.array_equal(out[..., 0], (x >> 8).astype(np.uint8))
    assert (out == 255).mean() < 0.05


def test_rgba_composited_on_white(tmp_path):
    x = np.zeros((4, 4, 4), dtype=np.uint8)
    x[..., 0] = 200
    x[0, 0, 3] = 255  # opaque red-ish pixel
    x[0, 1, 3] = 0  # fully transparent
    x[0, 2, 3] = 128  # half
    out = np.asarray(load_rgb(save(tmp_path, Image.fromarray(x, "RGBA"), "a.png")))
    assert tuple(out[0, 0]) == (200, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert abs(int(out[0, 2, 0]) - 227) <= 1 and abs(int(out[0, 2, 1]) - 127) <= 1


def test_palette_png(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    p_img = Image.fromarray(x).quantize(16)
    expected = np.asarray(p_img.convert("RGB"))
    out = np.asarray(load_rgb(save(tmp_path, p_img, "p.png")))
    assert np.array_equal(out, expected)


def test_palette_with_transparency(tmp_path):
    p_img = Image.new("P", (4, 4), 0)
    p_img.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    p_img.putpixel((1, 1), 1)
    p_img.info["transparency"] = 1
    out = np.asarray(load_rgb(save(tmp_path, p_img, "pt.png", transparency=1)))
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    rgb = Image.new("RGB", (16, 16), (200, 40, 90))
    out = np.asarray(load_rgb(save(tmp_path, rgb.convert("CMYK"), "c.jpg", quality=100)))
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - np.array([200, 40, 90])).max() <= 6


def test_greyscale_and_upper_case_jpeg(tmp_path):
    x = np.full((16, 16), 90, dtype=np.uint8)
    out = np.asarray(load_rgb(save(tmp_path, Image.fromarray(x, "L"), "G.JPEG", format="JPEG", quality=100)))
    assert out.shape == (16, 16, 3) and np.abs(out.astype(int) - 90).max() <= 2


def _png_rgb16(path, arr16: np.ndarray) -> None:
    """Write a 48-bit RGB PNG (Pillow cannot write one)."""
    import struct
    import zlib
    h, w, _ = arr16.shape
    data = arr16.astype(">u2")
    raw = b"".join(b"\x00" + data[y].tobytes() for y in range(h))

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_rgb_png(tmp_path):
    x = np.zeros((2, 3, 3), dtype=np.uint16)
    x[..., 0], x[..., 1], x[..., 2] = 40000, 1000, 65535
    p = tmp_path / "rgb48.png"
    _png_rgb16(p, x)
    out = np.asarray(load_rgb(p))
    assert out.dtype == np.uint8 and tuple(out[1, 2]) == (40000 >> 8, 1000 >> 8, 255)


def test_dark_16bit_greyscale_stays_dark(tmp_path):
    x = np.full((4, 4), 200, dtype=np.uint16)  # nearly black in 16 bits
    p = tmp_path / "dark.png"
    Image.fromarray(x).save(p)
    assert int(np.asarray(load_rgb(p)).max()) == 0


def test_the_image_files_torchvisions_imagefolder_reads_are_read(tmp_path, capsys):
    """TIFF (8-bit RGB and 16-bit greyscale), PPM and PGM, as torchvision's ImageFolder takes them: a folder
    moved over from it loses no image."""
    root = write_folder(tmp_path / "data", classes=2, train_per_class=2, val_per_class=1)
    rgb = np.zeros((40, 40, 3), dtype=np.uint8)
    rgb[:, :20] = (200, 30, 30)
    folder = root / "train" / "circle"
    Image.fromarray(rgb).save(folder / "a.tif")
    Image.fromarray(rgb).save(folder / "b.ppm")
    Image.fromarray(rgb[..., 0]).save(folder / "c.pgm")
    Image.fromarray((np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40)).save(folder / "d.TIFF")
    for name in ("a.tif", "b.ppm"):
        assert np.array_equal(np.asarray(load_rgb(folder / name)), rgb)
    assert np.asarray(load_rgb(folder / "d.TIFF")).max() > 200  # 16 bits scaled down, not clipped to white
    Image.fromarray(np.full((40, 40), 199, dtype=np.uint16)).save(tmp_path / "dark.pgm")  # 16-bit samples
    assert np.asarray(load_rgb(tmp_path / "dark.pgm")).max() == 0  # 199 of 65535: black, not 199 of 255
    assert main(["data", "check", str(root)]) == 0
    assert "10 image files, 0 unreadable" in capsys.readouterr().out
