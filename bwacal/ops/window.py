"""Output size and padding of sliding-window ops (Conv, MaxPool, AveragePool), 2-D."""

from __future__ import annotations

from dataclasses import dataclass

from bwacal.ops.base import Unsupported


@dataclass(frozen=True)
class Window:
    kh: int
    kw: int
    sh: int
    sw: int
    dh: int
    dw: int
    ph: int  # top padding
    pw: int  # left padding
    ho: int
    wo: int
    pad_end_h: int = 0
    pad_end_w: int = 0


def check_2d(kernel_shape, shapes, what):
    """Refuse anything but 2-D windows at load time, when the ranks are known."""
    if kernel_shape is not None and len(kernel_shape) != 2:
        raise Unsupported(f"{len(kernel_shape)}-D {what} (only 2-D is supported)")
    for s in shapes:
        if s is not None and len(s) != 4:
            raise Unsupported(f"input of rank {len(s)} (only 4-D NCHW {what} is supported)")


def window(h, w, kernel, strides, dilations, pads, auto_pad, ceil_mode=False) -> Window:
    strides = strides or (1, 1)
    dilations = dilations or (1, 1)
    out, begin, end = [], [], []
    for i, size in enumerate((h, w)):
        k, s, d = kernel[i], strides[i], dilations[i]
        eff = (k - 1) * d + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            o = -(-size // s)
            total = max((o - 1) * s + eff - size, 0)
            b = total // 2 if auto_pad == "SAME_UPPER" else (total + 1) // 2
            e = total - b
        elif auto_pad == "VALID":
            b = e = 0
            o = (size - eff) // s + 1
        elif auto_pad in ("NOTSET", "", None):
            b, e = (pads[i], pads[i + 2]) if pads else (0, 0)
            span = size + b + e - eff
            if ceil_mode:
                o = -(-span // s) + 1
                if (o - 1) * s >= size + b:  # the last window would start in the end padding
                    o -= 1
            else:
                o = span // s + 1
        else:
            raise ValueError(f"auto_pad '{auto_pad}' is not one of NOTSET, SAME_UPPER, SAME_LOWER, VALID")
        if o < 1:
            raise ValueError(f"window {k} (dilation {d}) does not fit an input of size {size}")
        out.append(o)
        begin.append(b)
        end.append(e)
    return Window(kernel[0], kernel[1], strides[0], strides[1], dilations[0], dilations[1],
                  begin[0], begin[1], out[0], out[1], end[0], end[1])
