"""The bridge to the engines that train LLM agents: the classifier term as a TRL GRPOTrainer (trl_gcd.py), a
runnable example on a tiny local model (example.py), and the tests that hold it to TRL and to verl's GRPO
(test_bridge.py). Optional: `make bridge` and `make test-bridge` install bridge/requirements.txt into .venv-bridge."""
