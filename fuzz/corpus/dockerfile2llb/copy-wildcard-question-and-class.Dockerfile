FROM scratch
COPY ?.txt /q/
COPY [a].txt /c/
