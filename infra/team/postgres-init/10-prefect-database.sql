-- Run once by the postgres image on an empty data volume (after POSTGRES_DB=mlflow is created):
-- the Prefect server gets its own database on the same instance.
CREATE DATABASE prefect;
