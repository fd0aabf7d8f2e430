"""The cases app behind wsgiref.validate.validator.

The validator checks the server's half of PEP 3333 as well as the app's: a
worker that breaks one of those rules makes it raise AssertionError or warn,
and either shows up in the worker's log.
"""

from wsgiref.validate import validator

from cases.cases import application as cases_application

application = validator(cases_application)
