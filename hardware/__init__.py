"""What this box can run right now: sensor probes, GGUF header facts, memory estimates, the governor."""
