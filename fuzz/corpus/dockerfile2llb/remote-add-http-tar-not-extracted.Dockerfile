FROM scratch
ADD {{HTTP}}/files.tar /t/
