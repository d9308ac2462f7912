FROM scratch
COPY . /all/
