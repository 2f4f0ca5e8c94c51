"""The precision names the command lines offer, kept free of torch: `spamclf.predict` and `spamclf.serve` list
them in their --help before they know whether torch is needed at all (an ONNX graph runs without it).
`spamclf.precision` is the one place that reads them."""

CHOICES = ("auto", "bf16", "fp16", "fp32")  # what the command lines offer; Lightning's own names work too
