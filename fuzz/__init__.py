"""qcowfs's own fuzzer and crash campaign (``make fuzz``, ``make crash``); see docs/robustness.md."""
