"""Imports every command module so each registers its commands on the app."""

from kdcache.cli import bench, demo, report, store, train  # noqa: F401  (define commands on `app`)
from kdcache.cli.app import app
from kdcache.cli.data import data_app
from kdcache.cli.views import views_app

app.add_typer(data_app, name="data")
app.add_typer(views_app, name="views")
