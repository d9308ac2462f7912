FROM scratch
COPY *.txt /w/
