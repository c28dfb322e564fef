"""The contract: what the scheduler, the agents, the CLI and the runtimes agree on, and nothing else.

Like Kubernetes' `k8s.io/api` types it is one place used by server, node agent and client: the job spec
(`jobspec`), the models and wire messages (`models`), the workspace/artifact archive (`archive`), where local
state lives (`paths`), the HTTP transport settings (`transport`), errors and exit codes (`errors`) and the
version. It imports nothing else of the project (import-linter checks it in `make lint`), and this file imports
nothing at all, so `fedml --help` stays light.
"""

__version__ = "0.1.0"
