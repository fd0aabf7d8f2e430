"""The __project__ Flask app; corral's workers load `app:app` (see corral.toml)."""
import flask
from flask import Flask, render_template

app = Flask(__name__)


@app.route("/")
def home():
    return render_template("home.html", flask_version=flask.__version__)
