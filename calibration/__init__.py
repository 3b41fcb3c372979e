"""Checkpoint reading, MLP discovery, observers, scales and int8 weight quantization.

    checkpoint.py          find_mlps, open_checkpoint, read_mlp: lazy reads, MLP naming families
    quantize_weights.py    weight_error: how far an int8 weight is from its float weight
    model.py               load_mlps, swap_mlps, plan_swaps: quantized MLPs as modules, put at their seam in a model
    hf.py                  a local model directory through transformers (the `hf` extra): loading, inputs, fc1 modules
    capture.py             calibrate_model: what each MLP reads on real text or images, the --calib file
    evaluate.py            evaluate_quantized: the model's output with its MLPs quantized, against the original
    observers.py           activation clipping: max, percentile:P, mse
    smooth.py              SmoothQuant scales, folded into W1
    data.py                calibration inputs: a --calib file or synthetic, calibrate/verify splits
    quantize_mlp.py        one MLP quantized in memory (w8a16, w8a8)
    quantize.py            quantize_checkpoint: the whole file, streamed, and its report
    quantized_file.py      the int8 file's names and metadata record, read back for verify
    safetensors_stream.py  writing safetensors one tensor at a time
    safetensors_header.py  a safetensors header checked before the file is mapped
    outputs.py             every output: checked before the work, written all or nothing
    options.py, errors.py, memory.py
"""
