"""The hello job's program: prints a few lines and where it ran."""

import os
import platform

print(f"Hello from fedml launch on {platform.node()} (Python {platform.python_version()})")
for step in range(1, 4):
    print(f"step {step}/3", flush=True)
print(f"done: run {os.environ.get('FEDML_CURRENT_RUN_ID', '?')} rank {os.environ.get('FEDML_CLIENT_RANK', '0')}")
