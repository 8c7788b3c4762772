"""ONNX emitters for the quantization and sparsity ops (`ember.ir.opset_quant`).

Registered into `ember.export_onnx` with `register_emitter`; each writes standard ONNX (or
ONNX Runtime ``com.microsoft``) nodes so that Ember's CPU backend can run the rewritten graph in
ONNX Runtime. Ops without an emitter here still export to the ``ai.ember`` custom domain.
"""

from __future__ import annotations
