"""Installed into the vLLM test environment only (by scripts/vllm-env), never imported by library code.

PyPI's torchvision 0.28 is a CUDA build; next to the CPU torch 2.13.0 its import fails with
"operator torchvision::nms does not exist" (it registers fake kernels for operators its missing C++
library would define). vLLM's Qwen2-VL model file imports it through transformers. Defining the two
operator schemas before torchvision is first imported lets the import succeed; the operators stay
unimplemented (nothing here calls them). A `.pth` line imports this module at interpreter start; the
finder only acts when torchvision is imported, so other processes never load torch because of it.
"""

import sys


class _DefineTorchvisionOps:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch.library

            library = torch.library.Library("torchvision", "FRAGMENT")
            for op in ("nms", "qnms"):
                library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            sys.modules[__name__].library = library  # the definitions live as long as the library object
        return None


if not any(isinstance(finder, _DefineTorchvisionOps) for finder in sys.meta_path) and "torchvision" not in sys.modules:
    sys.meta_path.insert(0, _DefineTorchvisionOps())
