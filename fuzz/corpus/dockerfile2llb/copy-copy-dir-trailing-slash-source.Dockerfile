FROM scratch
COPY dir/ /t/
