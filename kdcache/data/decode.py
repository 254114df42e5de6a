"""An ffcv decoder that cuts each sample's view boxes out of its JPEG at decode time.

For images of their own sizes (ImageNet-like JPEG betons) a view policy's crop box
depends on the image's size, and decoding a whole 500x375 JPEG to keep 30% of it wastes
the CPU. The boxes are computed in torch by the view policy itself
(`ViewPolicy.crop_boxes`, from the view keys and the per-sample sizes) and written to a
table [N, V, 4] (top, left, height, width) before each pass; the compiled decoder reads
row `sample_id` of it. numba freezes arrays a compiled function closes over into
constants, so the table reaches the compiled code by its address instead (an int,
baked in once; the buffer is allocated once and only ever written in place) and is
viewed with `numba.carray`.

Per sample the decoder decodes one region holding all V boxes, each widened by MARGIN
pixels (MCU-aligned: a lossless crop of the JPEG, libjpeg-turbo's tjTransform, via
ffcv's `imdecode`), or the whole image when that region covers most of it anyway, then
resizes each box to S x S with ffcv's `resize_crop` (OpenCV, INTER_AREA). A decoded
pixel depends on its own 8x8 block and, through chroma upsampling, on the chroma
samples next to it, so pixels further than MARGIN from the region's edge (or on the
image's own edge) equal those of a whole-image decode: the box's pixels, and so the
views, do not depend on which other boxes shared the region (tested bitwise).
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

MARGIN = 16  # pixels decoded around a box: more than chroma upsampling reaches
MCU = 16  # lossless JPEG crops start on MCU boundaries; 16 is a multiple of every MCU size
WHOLE_IMAGE_FRACTION = 0.6  # decode the whole image when the region would cover this much of it


@intrinsic
def _int32_pointer(typingctx, address):
    """An integer address as an int32 pointer, for `numba.carray`."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return types.CPointer(types.int32)(address), codegen


def crop_decoder(table: np.ndarray, size: int):
    """The ffcv Operation decoding, for sample i, the V boxes table[i] as uint8 [V, S, S, 3]."""
    from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    class CropDecoder(SimpleRGBImageDecoder):
        def declare_state_and_memory(self, previous_state):
            largest = int(self.metadata["height"].max()) * int(self.metadata["width"].max()) * 3
            shape = (table.shape[1], size, size, 3)
            return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("u1")),
                    (AllocationQuery(shape, np.dtype("u1")), AllocationQuery((largest,), np.dtype("u1"))))

        def generate_code(self):
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            jpg = IMAGE_MODES["jpg"]
            address, rows, views = table.ctypes.data, table.shape[0], table.shape[1]

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                boxes = numba.carray(_int32_pointer(address), (rows, views, 4))
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.int64(field["height"]), np.int64(field["width"])
                    if field["mode"] != jpg:  # raw betons are one size and never come here
                        continue
                    y0, x0, y1, x1 = height, width, np.int64(0), np.int64(0)
                    for v in range(views):
                        top, left = np.int64(boxes[source_ix, v, 0]), np.int64(boxes[source_ix, v, 1])
                        y0 = min(y0, max(top - MARGIN, 0))
                        x0 = min(x0, max(left - MARGIN, 0))
                        y1 = max(y1, min(top + boxes[source_ix, v, 2] + MARGIN, height))
                        x1 = max(x1, min(left + boxes[source_ix, v, 3] + MARGIN, width))
                    y0, x0 = y0 - y0 % MCU, x0 - x0 % MCU
                    if (y1 - y0) * (x1 - x0) >= WHOLE_IMAGE_FRACTION * height * width:
                        y0, x0, y1, x1 = 0, 0, height, width
                    rh, rw = y1 - y0, x1 - x0
                    temp = temp_storage[dst_ix]
                    imdecode_c(image_data, temp, height, width, rh, rw, x0, y0, 1, 1, rh < height or rw < width,
                               False)
                    region = temp[:rh * rw * 3].reshape(rh, rw, 3)
                    for v in range(views):
                        top, left = boxes[source_ix, v, 0] - y0, boxes[source_ix, v, 1] - x0
                        resize_crop_c(region, top, top + boxes[source_ix, v, 2], left, left + boxes[source_ix, v, 3],
                                      destination[dst_ix, v])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return CropDecoder()
