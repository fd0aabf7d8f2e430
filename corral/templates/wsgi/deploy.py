"""Deploy step of __project__: corral runs it with the project's interpreter
once each time it starts, before the first request (its output goes to
log/deploy.log).  Put here what a new version needs before it serves."""
import sys

if __name__ == "__main__":
    print(f"deploy: Python {sys.version.split()[0]} in {sys.prefix}")
    print("deploy: done")
