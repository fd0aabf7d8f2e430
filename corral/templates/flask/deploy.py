"""Deploy step of __project__: corral runs it with the project's interpreter
once each time it starts, before the first request (its output goes to
log/deploy.log).  Put here what a new version needs before it serves:
database migrations (flask db upgrade), a cache to warm, ..."""
from pathlib import Path

if __name__ == "__main__":
    # Flask's instance folder: local files (a SQLite database, uploads) kept
    # out of git; made here so the app can count on it.
    instance = Path(__file__).resolve().parent / "instance"
    instance.mkdir(exist_ok=True)
    print(f"deploy: {instance} is ready")
    print("deploy: done")
