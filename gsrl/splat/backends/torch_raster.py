"""Tile-based front-to-back alpha compositing of projected Gaussians in plain PyTorch.

The image is cut into square tiles; every visible Gaussian is listed in the tiles its bounding box touches, and each
tile's list is sorted by depth (one int64 sort over keys tile << 32 | float-bits(depth), as gsplat does). Tiles are
then composited together in lock-step chunks of G Gaussians: a [tiles, pixels, G] block of alphas, a cumulative
product along G for transmittance, and one batched matmul for colour. Memory is bounded by ``chunk_elements`` (never
an [all pixels x all Gaussians] tensor), tiles whose lists are exhausted or whose pixels are all saturated drop out,
and the chunk widens as fewer tiles remain. Autograd flows through everything except the (integer) binning.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.999  # gsplat 1.5.3 clamps at 0.999 (the original 3DGS used 0.99)
MIN_TRANSMITTANCE = 1e-4  # a pixel stops before the Gaussian that would take T to <= this


def bin_gaussians(
    means2d: Tensor,
    radii: Tensor,
    depths: Tensor,
    image_ids: Tensor,
    n_images: int,
    tile_size: int,
    width: int,
    height: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Depth-sorted per-tile lists of the M visible Gaussians (all integer work, no gradients).

    Args:
        means2d [M, 2], radii [M, 2] (> 0), depths [M] (> 0) of the visible Gaussians, image_ids [M] in
        [0, n_images); the tile grid is ceil(width / tile_size) x ceil(height / tile_size) per image.

    Returns:
        (entries [n_isects] long: index into the M visible Gaussians, in (image, tile, depth) order;
         starts [n_tiles_total] long and counts [n_tiles_total] long: each tile's slice of ``entries``).
    """
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    centre = means2d / tile_size
    half = radii.to(means2d.dtype) / tile_size
    x0 = torch.floor(centre[:, 0] - half[:, 0]).clamp(0, tiles_x).long()
    x1 = torch.ceil(centre[:, 0] + half[:, 0]).clamp(0, tiles_x).long()
    y0 = torch.floor(centre[:, 1] - half[:, 1]).clamp(0, tiles_y).long()
    y1 = torch.ceil(centre[:, 1] + half[:, 1]).clamp(0, tiles_y).long()
    span_x = x1 - x0
    per_gaussian = span_x * (y1 - y0)
    entry = torch.repeat_interleave(torch.arange(len(per_gaussian), device=means2d.device), per_gaussian)
    first = torch.cumsum(per_gaussian, 0) - per_gaussian
    k = torch.arange(len(entry), device=means2d.device) - first[entry]
    span = span_x[entry]
    tile_x = x0[entry] + k % span
    tile_y = y0[entry] + k // span
    tile = (image_ids[entry] * tiles_y + tile_y) * tiles_x + tile_x
    # Positive IEEE floats order like their bit patterns, so one integer sort orders by tile, then depth.
    depth_bits = depths.to(torch.float32).contiguous().view(torch.int32).long()
    keys, order = torch.sort((tile << 32) | depth_bits[entry], stable=True)
    entries = entry[order]
    counts = torch.bincount(keys >> 32, minlength=n_images * tiles_y * tiles_x)
    starts = torch.cumsum(counts, 0) - counts
    return entries, starts, counts


def composite_tiles(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    tile_size: int = 8,
    chunk_elements: int = 1 << 20,
    min_chunk: int = 16,
    max_chunk: int = 256,
) -> tuple[Tensor, Tensor, dict[str, int]]:
    """Render I images from their projected Gaussians over a zero background.

    Args:
        means2d [I, N, 2], conics [I, N, 3], colors [I, N, D], opacities [I, N], depths [I, N], radii [I, N, 2]
        (entries with a zero radius are skipped); width/height in pixels.

    Returns:
        (colors [I, H, W, D] = sum_i alpha_i T_i c_i, alphas [I, H, W, 1] = 1 - T_final, stats).
    """
    n_images, n, channels = colors.shape
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    n_tiles_total = n_images * tiles_y * tiles_x
    pixels = tile_size * tile_size
    visible = (radii > 0).all(dim=-1)
    image_ids, gauss_ids = visible.nonzero(as_tuple=True)
    flat = image_ids * n + gauss_ids
    with torch.no_grad():
        entries, starts, counts = bin_gaussians(
            means2d.reshape(-1, 2)[flat].detach(),
            radii.reshape(-1, 2)[flat],
            depths.reshape(-1)[flat].detach(),
            image_ids,
            n_images,
            tile_size,
            width,
            height,
        )
        busy_tiles = counts.nonzero().squeeze(1)
        rows = flat[entries]  # [n_isects] row of [I * N] per tile-list slot
    # Per-intersection features in (tile, depth) order, gathered once (differentiable):
    # x, y, 0.5 a, b, 0.5 c, log(opacity) of the conic (a, b, c), and the colour.
    mx, my = means2d.reshape(-1, 2).index_select(0, rows).unbind(-1)
    ca, cb, cc = conics.reshape(-1, 3).index_select(0, rows).unbind(-1)
    log_o = torch.log(opacities.reshape(-1).index_select(0, rows))
    features = torch.stack([mx, my, 0.5 * ca, cb, 0.5 * cc, log_o], dim=-1)
    colors_sorted = colors.reshape(-1, channels).index_select(0, rows)
    colors_sorted = torch.cat([colors_sorted, torch.ones_like(colors_sorted[:, :1])], dim=-1)  # + a ones channel

    out_colors = colors.new_zeros(n_tiles_total, pixels, channels)
    out_trans = colors.new_ones(n_tiles_total, pixels)
    group = max(1, chunk_elements // (pixels * min_chunk))
    steps = 0
    for lo in range(0, len(busy_tiles), group):
        tiles = busy_tiles[lo : lo + group]
        acc, trans, n_steps = _composite_group(
            tiles, starts[tiles], counts[tiles], features, colors_sorted, tile_size, tiles_x, tiles_y,
            width, height, chunk_elements, min_chunk, max_chunk,
        )  # fmt: skip
        out_colors = out_colors.index_copy(0, tiles, acc)
        out_trans = out_trans.index_copy(0, tiles, trans)
        steps += n_steps

    def untile(x: Tensor) -> Tensor:  # [I*ty*tx, ts*ts, D] -> [I, H, W, D]
        x = x.reshape(n_images, tiles_y, tiles_x, tile_size, tile_size, -1).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n_images, tiles_y * tile_size, tiles_x * tile_size, -1)[:, :height, :width]

    stats = {"n_visible": int(len(flat)), "n_isects": int(len(entries)), "chunk_steps": steps}
    return untile(out_colors), 1.0 - untile(out_trans[..., None]), stats


def _composite_group(
    tiles: Tensor,
    starts: Tensor,
    counts: Tensor,
    features: Tensor,
    colors: Tensor,
    tile_size: int,
    tiles_x: int,
    tiles_y: int,
    width: int,
    height: int,
    chunk_elements: int,
    min_chunk: int,
    max_chunk: int,
) -> tuple[Tensor, Tensor, int]:
    """Composite a group of A tiles to completion -> (colors [A, P, D], transmittance [A, P], chunk steps).

    ``features`` [n_isects, 6] and ``colors`` [n_isects, D + 1] (the last channel all ones) are already in
    (tile, depth) order, so a tile's chunk is the contiguous rows starts + s .. starts + s + G.
    """
    device, dtype = features.device, features.dtype
    n_tiles, pixels = len(tiles), tile_size * tile_size
    offsets = torch.arange(tile_size, device=device, dtype=dtype) + 0.5  # pixel centres, as gsplat
    in_image = tiles % (tiles_x * tiles_y)
    px = (in_image % tiles_x)[:, None].to(dtype) * tile_size + offsets  # [A, ts] column centres
    py = (in_image // tiles_x)[:, None].to(dtype) * tile_size + offsets  # [A, ts] row centres
    alive = ((py < height)[:, :, None] & (px < width)[:, None, :]).reshape(n_tiles, pixels)  # padding never renders
    trans = features.new_ones(n_tiles, pixels)
    acc = colors.new_zeros(n_tiles, pixels, colors.shape[-1] - 1)
    grad = torch.is_grad_enabled() and (features.requires_grad or colors.requires_grad)
    last = len(features) - 1
    start, steps = 0, 0
    active = torch.arange(n_tiles, device=device)
    while True:
        active = active[(counts[active] > start) & alive[active].any(dim=1)]
        n_active = len(active)
        if n_active == 0:
            break
        g = int(min(max(chunk_elements // (n_active * pixels), min_chunk), max_chunk))
        slot = start + torch.arange(g, device=device)
        valid = slot[None, :] < counts[active, None]  # [a, G]
        rows = torch.clamp(starts[active, None] + slot, max=last).reshape(-1)
        gx, gy, half_a, b, half_c, log_o = features.index_select(0, rows).view(n_active, g, 6).unbind(-1)
        log_o = log_o.masked_fill(~valid, float("-inf"))  # past the end of a tile's list: alpha 0
        dx = gx[:, None, :] - px[active][:, :, None]  # [a, ts(col), G]
        dy = gy[:, None, :] - py[active][:, :, None]  # [a, ts(row), G]
        # log alpha = log o - (0.5 a dx^2 + b dx dy + 0.5 c dy^2), split into row-only, column-only and cross terms
        # so only two passes run over the full [a, rows, cols, G] block.
        row_term = log_o[:, None, :] - half_c[:, None, :] * dy * dy
        col_term = half_a[:, None, :] * dx * dx
        separable = row_term[:, :, None, :] - col_term[:, None, :, :]  # [a, rows, cols, G]
        log_alpha = torch.addcmul(separable, (b[:, None, :] * dy)[:, :, None, :], dx[:, None, :, :], value=-1.0)
        if grad:
            alpha = torch.exp(log_alpha).clamp_max(MAX_ALPHA)
            alpha = torch.where(alpha >= ALPHA_THRESHOLD, alpha, 0.0)
        else:  # same arithmetic without the temporaries
            alpha = log_alpha.exp_().clamp_max_(MAX_ALPHA)
            alpha = alpha.masked_fill_(alpha < ALPHA_THRESHOLD, 0.0)
        alpha = alpha.view(n_active, pixels, g)
        alive_a = alive[active]
        trans_a = trans[active]
        t0 = torch.where(alive_a, trans_a, 0.0)  # finished pixels composite nothing more
        # Transmittance before and after each Gaussian in one cumulative product: [T0, T0(1-a1), T0(1-a1)(1-a2), ..].
        t = torch.cat([t0[..., None], 1.0 - alpha], dim=-1).cumprod(dim=-1)
        # gsplat's exclusive stop: the Gaussian that would take T to <= 1e-4 is not drawn, nor any after it. T only
        # falls along the list, so "live" is a prefix of each pixel's chunk.
        live = t[..., 1:] > MIN_TRANSMITTANCE
        weights = alpha * t[..., :-1]  # alpha_i T_i, [a, P, G]
        weights = torch.where(live, weights, 0.0) if grad else weights.masked_fill_(~live, 0.0)
        gathered = colors.index_select(0, rows).view(n_active, g, -1).masked_fill(~valid[..., None], 0.0)
        contrib = torch.bmm(weights, gathered)  # [a, P, D + 1]; the last channel is sum_i alpha_i T_i
        # T after the last live Gaussian = T0 - sum of its weights (the weights telescope: alpha_i T_i = T_i - T_i+1).
        t_new = torch.where(alive_a, t0 - contrib[..., -1], trans_a)
        if grad:
            trans = trans.index_copy(0, active, t_new)
            acc = acc.index_copy(0, active, acc[active] + contrib[..., :-1])
        else:
            trans[active] = t_new
            acc[active] += contrib[..., :-1]
        alive[active] = alive_a & live[..., -1]
        start += g
        steps += 1
    return acc, trans, steps
