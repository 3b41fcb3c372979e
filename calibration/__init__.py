"""Checkpoint reading, MLP discovery, observers, scales and int8 weight quantization.

    checkpoint.py          open_checkpoint (a file or a model directory, sharded), find_mlps, read_mlp
    families.py            the GELU MLP families: names, layouts, LayerNorms, GELU from config.json
    quantize_weights.py    int8 weights a block of channels at a time, the weight error measured on the way
    model.py               load_mlps, swap_mlps, plan_swaps: quantized MLPs as modules, put at their seam in a model
    hf.py                  a local model directory through transformers (the `hf` extra): loading, inputs, fc1 modules
    capture.py             calibrate_model: what each MLP reads on real text or images, the --calib file
    evaluate.py            evaluate_quantized: the model's output with its MLPs quantized, against the original
    observers.py           activation clipping: max, percentile:P, mse
    smooth.py              SmoothQuant scales, folded into W1
    data.py                calibration inputs: a --calib file or synthetic, calibrate/verify splits
    quantize_mlp.py        one MLP quantized in memory (w8a16, w8a8)
    quantize.py            quantize_checkpoint: a file or a model directory, streamed, and its report
    quantized_file.py      the compressed-tensors int8 format: names, shapes, config, record; reading it back
    inspect.py             inspect_checkpoint: what quantize would act on, and why
    safetensors_stream.py  safetensors headers, reads, and writing one tensor at a time
    safetensors_header.py  a safetensors header checked before the file is mapped
    outputs.py             every output: checked before the work, written all or nothing
    timing.py              PhaseTimer: where a run's seconds went, for quantize's and verify's timing line
    options.py, errors.py, memory.py
"""
